"""imat.scale: imat's embedding on an existing distributed engine (Ray Data), writing the engine's own parts.

The `scale` extra installs Ray; nothing outside this package imports Ray, and this package uses only
the engine's pieces (decoder, ONNX Runtime session, embeddings folder), so its output is the same
folder `imat embed` writes in one process.
"""
