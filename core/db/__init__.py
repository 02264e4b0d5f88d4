"""The database: one declarative Base, the ORM models, engines and sessions, and the state machine.

The database is the single source of truth for every study; see docs/architecture.md for the schema.
"""
