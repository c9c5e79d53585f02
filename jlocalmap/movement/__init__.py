"""Movement: traceable moves between layouts, and the public distribute / redistribute / full_tensor."""
