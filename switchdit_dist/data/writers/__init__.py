"""Writers behind ``switchdit prepare``: each turns one kind of source into shards + manifest."""
