"""Layouts: placements, PartitionSpecs, meshes, chunks, the ``Layout`` value and reading a value's layout."""
