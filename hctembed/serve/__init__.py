"""``hctembed serve``: search as a service over one database (see docs/serve.md)."""
