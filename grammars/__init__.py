"""constrain.grammars"""
