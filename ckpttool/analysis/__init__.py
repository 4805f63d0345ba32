"""What a checkpoint holds: state dicts and prefixes, sharing, value descriptions, the report."""
