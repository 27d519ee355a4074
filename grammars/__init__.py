"""constrain.grammars: constraints from text — regex (byte-level DFAs), Lark grammars, JSON Schema.

Import the constructors from their modules (`from constrain.grammars.regex import regex, choice`) or use the
top-level shortcuts `constrain.regex` / `constrain.choice`.
"""
