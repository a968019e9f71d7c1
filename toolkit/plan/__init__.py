"""Planning: profiles of split points, the runtime model of each mode, the planner."""
