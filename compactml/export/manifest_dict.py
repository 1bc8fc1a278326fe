"""The preset zlib dictionary of compressed ``.cml`` manifests (format version 2). FROZEN.

A manifest is a few kilobytes of JSON whose keys and common values (field names, transform and
module types, quantization schemes, the records of compactml's own techniques at their default
settings) are the same in every artifact. zlib compresses a text that short poorly from
scratch; given these strings as a preset dictionary it halves it (the digits-cnn static INT8
manifest: 886 bytes with zlib alone, 445 with the dictionary). The dictionary holds vocabulary
only, nothing of a particular model.

Every version 2 artifact needs exactly these bytes to be read: never edit this file. A better
dictionary needs a new format version, with this one kept for reading version 2 files.
``tests/export/test_manifest_compression.py`` pins its SHA-256.
"""

from __future__ import annotations

# Rarer strings first: zlib finds the ones near the end of the dictionary with shorter codes.
_PARTS = (
    # sources and the rarer transforms
    '"source":{"class":"BertModel","config":{"model_type":"bert","hidden_size":',
    '"kind":"hf","path":"',
    '"kind":"factory","path":"',
    '"sha256":"',
    '"spec":"',
    '"num_attention_heads":',
    '"intermediate_size":',
    '"num_hidden_layers":',
    '{"module":"',
    '"op":"set_config","key":"',
    '"value":',
    '"op":"set","attr":"num_heads","tuple":false,"value":',
    '"op":"delete","none":false}',
    '"op":"add_tensor","kind":"buffer","name":"',
    '"requires_grad":false,',
    '"op":"remove_tensor",',
    # module arguments and types
    '"eps":1e-05,"momentum":0.1,"affine":true,"track_running_stats":true,"num_features":',
    '"elementwise_affine":true,"normalized_shape":[',
    '"embedding_dim":',
    '"num_embeddings":',
    '"max_norm":null,"norm_type":2.0,"padding_idx":null,"scale_grad_by_freq":false,"sparse":false',
    '"approximate":"none"',
    '"inplace":false',
    '"p":0.1',
    '"features":',
    '"start_dim":1,"end_dim":-1',
    '"output_size":',
    '"count_include_pad":true',
    '"divisor_override":null',
    '"type":"AvgPool2d"',
    '"type":"AdaptiveAvgPool2d"',
    '"type":"BatchNorm2d"',
    '"type":"LayerNorm"',
    '"type":"Embedding"',
    '"type":"QuantEmbedding"',
    '"type":"Dropout"',
    '"type":"GELU"',
    '"type":"Flatten"',
    '"type":"Sequential"',
    '"type":"ScaledInput"',
    '"type":"Conv2d"',
    '"type":"DynamicQuantLinear"',
    '"type":"Linear"',
    '"ceil_mode":false,"dilation":1,"kernel_size":',
    '"padding":0,"return_indices":false,"stride":',
    '"type":"MaxPool2d"',
    '"type":"ReLU"',
    '"type":"Identity"',
    '"bias":true,"dilation":[1,1],"groups":1,"in_channels":',
    '"kernel_size":[',
    '"out_channels":',
    '"padding":[0,0],"padding_mode":"zeros",',
    '"stride":[1,1]}',
    '"bias":false',
    '"in_features":',
    '"out_features":',
    # quantization schemes
    '"dtype":"bfloat16","kind":"float"',
    '"granularity":{"size":32,"type":"group"}',
    '"granularity":{"type":"tensor"}',
    '"symmetric":false',
    '{"bits":4,"granularity":{"axis":0,"type":"channel"},"kind":"int","scale_dtype":"float16",'
    '"symmetric":true}',
    '"scheme":{"bits":8,"granularity":{"axis":0,"type":"channel"},"kind":"int",'
    '"scale_dtype":"float16","symmetric":true}',
    '{"args":{"inner":{"args":{"inplace":false},"type":"ReLU"},"quant":{"bits":8,"signed":false}},'
    '"type":"QuantOutput"}',
    '"input_quant":{"bits":8,"signed":false},',
    '"output_quant":',
    '"op":"replace","spec":{"args":{}',
    '"op":"convert","spec":{"args":{',
    '"type":"QuantConv2d"',
    '"type":"QuantLinear"',
    # history records
    '"history":[{"activation_quantizers":',
    '"activation_scales":',
    '"changed":["',
    '"family":"prune",',
    '"family":"quantize",',
    '"float_layers":[],',
    '"params":{"bits":8,"calib_batches":null,"exclude":[],"group_size":32,"include":["*"],',
    '"observer":"minmax","per_channel":true,"percentile":99.99,"progress":false},',
    '"skipped":{},',
    '"sparsity":',
    '"technique":"',
    # encodings and the rest of the manifest
    '"aliases":{},"encodings":{',
    '"kind":"sparse","mask":"',
    '::mask"',
    '"kind":"bits",',
    '"fill":0,',
    '"dtype":"int64","kind":"packed","shape":[]},',
    '"dtype":"uint8","kind":"packed","shape":[',
    '"dtype":"float16","kind":"packed","shape":[',
    '"dtype":"int32","kind":"packed","shape":[]},',
    '"dtype":"float32","kind":"packed","shape":[',
    '.bias":{',
    '.weight":{',
    '.scale":{',
    '.zero_point":{',
    '"format":"compactml.artifact","format_version":2,',
    '"metrics":null,',
    '"source":{"kind":"builtin","name":"',
    '"tensor_sha256":"',
    '"tool_version":"',
    '"transforms":[{"module":"',
)

MANIFEST_ZDICT: bytes = "".join(_PARTS).encode("ascii")
