"""Configuration: the YAML contract (DESIGN §3).

`schema` holds the pure models (made of `units`, `smtp`, `clients` and `auth`, re-exported by
`schema`); `load` turns a file into them, with `credentials` and `tls` doing the reading;
`problems` words the errors and `advice` the warnings of `check-config`.
"""
