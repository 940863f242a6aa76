"""The CPU demo: a short-context starting model (``pretrain``), its text domain (``world``)."""
