"""Base: what every layer may use. `errors` (the exception types, one line each to the user),
`atomic` (outputs written whole or not at all), `paths` (the user cache).

May import: nothing of the package.
"""
