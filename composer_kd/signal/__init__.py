"""The offline teacher signal: each position's top-k teacher logits and remaining probability mass, written once
to MosaicML Streaming shards and read back in place of a live teacher."""
