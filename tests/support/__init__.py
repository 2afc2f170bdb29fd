"""What several test modules share: the API's stubs and their answers, the replay scenarios of
every operation kind, the random workload, the check of the books, the repository's paths.

The folder `tests/` is on pytest's `pythonpath`, so test modules in every layer's folder import
these as `support.…`."""
