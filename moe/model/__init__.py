"""A plain DeepSeek-V3-style transformer; parallelism is applied from outside."""
