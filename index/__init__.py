"""constrain.index"""
