"""archiver: streams a directory of files as a ZIP archive, made while it is sent."""

__version__ = "0.1.0"
