"""The archive: what goes in (listing), its plan (every record's bytes and offset), CRCs, and the producer.

Nothing here knows HTTP.  ``producer_program`` and what it imports
(``producer_protocol``, ``producer_files``, ``producer_output``, ``zipformat``,
``sparse``, ``real_paths``) use the standard library only: the producer
subprocess imports them without the service's dependencies.
"""
