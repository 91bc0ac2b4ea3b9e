import difflib, torch, fxtp
from fxtp.tiny_configs import tiny_model
import fxtp.decode.layer_regions as lr
model = tiny_model("llama", layers=6)
gen = fxtp.compile(model, 1).generator(0, device="cuda", compile=True)
gen.prepare(1, 256)
print("regions", gen._decode.compiled.regions, gen._prefill.compiled.regions)
m = gen._modules[0]
runs = lr.layer_runs(m.graph); later = lr.read_later(m.graph, runs)
keys = [lr.Region(r, later).key(m) for r in runs]
print(len(runs), len(set(keys)), [len(r) for r in runs])
print([n.target for n in m.graph.nodes if n.op == "get_attr"][:6])
for i in range(2, len(keys) - 1):
    if keys[i] != keys[1]:
        print("code equal:", keys[i][0] == keys[1][0])
        print("\n".join(list(difflib.unified_diff(keys[1][0].splitlines(), keys[i][0].splitlines(), lineterm=""))[:40]))
        for a, b in zip(keys[1][1], keys[i][1]):
            if a != b: print(a, b)
        break
