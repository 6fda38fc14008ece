"""Backends that run client hosts: in-process (``local``) or Ray actors (``ray``)."""
