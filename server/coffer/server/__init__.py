"""Coffer's gRPC server: translation only. It converts requests to the core's values
(`convert`), hands their operations to the core's ledger (through the `batcher`), converts the
answers back and turns the core's errors into statuses in one table (`errors`); `admission`,
`settings`, `app` and the `serve`, `migrate` and `bench` commands (`cli`) run it. It decides no
rule of the domain. It may import the core, the generated messages (`coffer.v1`), the embedded
PostgreSQL (`coffer.postgres`), the benchmark (for `coffer bench`), and of the client's
distribution only the rule for callers and two constants of its errors (tests/test_project.py
holds it so). Each module names its public names in `__all__`; the package itself exports
none.
"""

__all__: list[str] = []
