"""Small models in this process or on this machine's GPU: llama.cpp, vLLM, sentence encoders, heads and the measured
classifier choice.
"""
