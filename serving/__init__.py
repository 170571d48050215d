"""Online retrieval: the user tower at request time, faiss top-k over the published item vectors, over HTTP."""
