"""The archive: what goes in (listing), its plan (every record's bytes and offset), CRCs, and the producer.

Nothing here knows HTTP.  ``zipformat`` and ``producer_program`` use the
standard library only: the producer subprocess imports them without the
service's dependencies.
"""
