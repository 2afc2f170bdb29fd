"""A PostgreSQL cluster run by Coffer itself: the server's embedded database (with no
`DATABASE_URL`), the tests' throwaway one and the benchmark's; see `supervisor`."""

__all__: list[str] = []
