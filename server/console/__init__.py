"""The operator console: a web page over the broker (search, find similar, sightings,
fleet, exports) with sign-in and an audit log. See docs/console.md."""
