"""Bridges to other tools. Each submodule imports its tool only when it is used."""
