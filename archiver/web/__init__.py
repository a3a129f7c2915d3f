"""The HTTP surface: routes, ranges, signed links, limits, pages, metrics and the download's nursery.

It asks the archive part (``archiver.archive``) for a plan and a producer,
and the fences (``archiver.fences``) for the server's behaviour it needs.
"""
