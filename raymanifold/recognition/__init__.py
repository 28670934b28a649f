"""Recognition manifolds: contrastive embeddings (SupCon / InfoNCE) and the Sec. 4.3 attribute-KL study."""
