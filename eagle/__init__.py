"""eagle: the EAGLE-3 draft-head library (model, training-time test, loss, vocabulary map, inference, export).

Imports torch and safetensors only; the target's config arrives as a plain dict.
"""
