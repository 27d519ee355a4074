"""constrain.kernels"""
