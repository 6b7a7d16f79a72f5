"""Configuration: the YAML contract (DESIGN §3).

`schema` holds the pure models, `load` turns a file into them, `problems` words the errors.
"""
