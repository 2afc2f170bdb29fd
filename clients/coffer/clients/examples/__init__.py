"""Programs that show the client at work, each run as `python -m coffer.clients.examples.NAME`
against a server. They import only the client's public surface (`coffer.clients`), as users'
code would.
"""

__all__: list[str] = []
