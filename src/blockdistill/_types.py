"""jaxtyping aliases shared by every module of blockdistill."""

from jaxtyping import Array, Bool, Float, Int

#: Token ids of one example.
Tokens = Int[Array, "seq"]
#: Token ids of a batch.
BatchTokens = Int[Array, "batch seq"]
#: Document segment ids of one example: positions with equal ids belong to one document
#: of a packed row (0 marks padding).
Segments = Int[Array, "seq"]
#: Document segment ids of a batch.
BatchSegments = Int[Array, "batch seq"]
#: A validity mask of a batch (``True`` where a position counts in the loss).
BatchMask = Bool[Array, "batch seq"]
#: The residual stream (or any per-token feature) of one example.
Hidden = Float[Array, "seq dim"]
#: A per-layer feature of one example, stacked on the leading ``layers`` axis.
LayerHidden = Float[Array, "layers seq dim"]
#: Logits of one example.
Logits = Float[Array, "seq vocab"]
#: A scalar.
Scalar = Float[Array, ""]
