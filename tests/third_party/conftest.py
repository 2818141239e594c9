"""Third-party test suites vendored unchanged (see each file's header). They need a running
server and their own settings, so the collection of `tests/` skips them; the integration
test that drives each one (tests/integration/test_clients.py) starts the server and runs the
suite in its own pytest process."""

collect_ignore = ["optillm"]
