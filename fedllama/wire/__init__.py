"""What crosses the wire: record keys, tensors <-> Flower records, reply validation, flattening."""
