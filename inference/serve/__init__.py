"""The online service: the nightly model answering one user at a time (issue 32). See inference/serve/app.py."""
