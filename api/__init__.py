"""The HTTP API (Flask + apiflask): jobs, batches, uploads and operations; imports only core/."""
