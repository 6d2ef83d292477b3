"""sli's version: written into every manifest (a module of its own, so that nothing inside
``sli`` imports the package's ``__init__``)."""

__version__ = "0.1.0"
