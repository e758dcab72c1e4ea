"""Operations on tensors that are not strategies: edits of a base tensor (``edits``) and one module of a merge (``combine``)."""
