// geglu: out[t, i] = act(x[t, i]) · x[t, I + i] for x = [input half | gate half], one
// invocation per output value.

struct Params {
    rows: u32,
    inner: u32,  // I
    act: u32,
    _pad0: u32,
}

@group(0) @binding(0) var<storage, read> x: array<T>;          // [T, 2I]
@group(0) @binding(1) var<storage, read_write> out: array<T>;  // [T, I]
@group(1) @binding(0) var<uniform> p: Params;

@compute @workgroup_size(256)
fn main(inv: Invocation) {
    let e = element_index(inv);
    if e >= p.rows * p.inner {
        return;
    }
    let t = e / p.inner;
    let i = e % p.inner;
    let base = t * 2u * p.inner;
    out[e] = T(activate(f32(x[base + i]), p.act) * f32(x[base + p.inner + i]));
}
