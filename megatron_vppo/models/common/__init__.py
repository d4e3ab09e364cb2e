"""Model-independent Megatron pieces shared by the model folders: packed (`thd`) core attention for the
local layer spec, and the Transformer Engine vs local layer-spec choice."""
