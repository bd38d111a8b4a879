"""Offline demo assets for promptdg: a generated multi-domain digits world (see world.py)."""
