"""What the compiler makes of the kernels: every bf16 launch at the released KPhi-3 shapes, in its
first-choice config, compiled for sm_90a on the CPU (ptxas and cuobjdump ship with the Triton
wheel) must use HGMMA where it does a dot, not spill, fit in shared memory and make no scalar
16-bit global loads or stores in a matrix kernel beyond those a launch's design makes
(``NARROW_ACCESSES``: the decode forward's strided activation rows, dx's gathered addend), at a
training and a decode size (``kphi3_bench.compile_report.check_properties``).

The compile runs in a subprocess without ``TRITON_INTERPRET``: this file's conftest turns the
interpreter on for CPU machines, and interpreted kernels cannot be compiled.
"""
import json
import os
import subprocess
import sys

import pytest
import triton

from kphi3_bench import compile_report as cr

SASS_SNIPPET = """
\tcode for sm_90a
\t.target\tsm_90a

\t\tFunction : _grouped_gemm_kernel
\t.headerflags\t@"EF_CUDA_ACCELERATORS EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                      /* 0x00000a00ff017b82 */
                                                                               /* 0x000ff00000000800 */
        /*0010*/              @!P0 LDGSTS.E.BYPASS.128 [R5], desc[UR8][R2.64] ;
        /*0020*/                   LDGSTS.E.64 [R7], desc[UR8][R2.64] ;
        /*0030*/               @P1 LDG.E.U16 R4, desc[UR4][R2.64] ;
        /*0040*/                   LDG.E.U16 R6, desc[UR4][R8.64] ;
        /*0050*/                   LDG.E R9, desc[UR4][R8.64] ;
        /*0060*/                   LDG.E.128.CONSTANT R12, desc[UR4][R8.64] ;
        /*0070*/                   HGMMA.64x256x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*0080*/                   HMMA.16816.F32.BF16 R40, R44, R48, R40 ;
        /*0090*/                   FFMA R3, R4, R5, R3 ;
        /*00a0*/                   STL.64 [R1], R10 ;
        /*00b0*/                   LDL R10, [R1+0x8] ;
        /*00c0*/                   SHFL.BFLY PT, R3, R2, 0x1, 0x1f ;
        /*00d0*/                   UTMALDG.2D [UR8], [UR4] ;
        /*00e0*/                   STG.E.128 desc[UR4][R2.64], R8 ;
        /*00f0*/             @!UP0 STG.E.U16 desc[UR4][R2.64], R8 ;
        /*0100*/                   STG.E desc[UR4][R2.64], R8 ;
        /*0110*/                   EXIT ;
        /*0120*/                   BRA 0x120;
"""


def test_parse_sass_counts_instruction_kinds():
    parsed = cr.parse_sass(SASS_SNIPPET)
    assert parsed["instructions"] == 19
    assert parsed["mma"] == "HGMMA"
    assert parsed["memory"] == {
        "LDGSTS.128": 1, "LDGSTS.64": 1, "LDG.E.U16": 2, "LDG.E": 1, "LDG.E.128": 1,
        "STL": 1, "LDL": 1, "SHFL": 1, "UTMALDG": 1, "STG.E.128": 1, "STG.E.U16": 1, "STG.E": 1,
    }
    assert parsed["local_store_bytes"] == 8 and parsed["local_load_bytes"] == 4
    assert parsed["opcodes"]["HMMA"] == 1
    # The class is the best one present.
    assert cr.parse_sass(SASS_SNIPPET.replace("HGMMA", "NOP"))["mma"] == "HMMA"
    no_mma = SASS_SNIPPET.replace("HGMMA", "NOP").replace("HMMA", "NOP")
    assert cr.parse_sass(no_mma)["mma"] == "FFMA"
    assert cr.parse_sass("")["mma"] == "none"


def test_parse_ptxas_log():
    log = ("ptxas info    : Compiling entry function '_k' for 'sm_90a'\n"
           "ptxas info    : Function properties for _k\n"
           "    16 bytes stack frame, 24 bytes spill stores, 20 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers\n")
    assert cr.parse_ptxas_log(log) == {"regs": 255, "stack_bytes": 16, "spill_store_bytes": 24,
                                       "spill_load_bytes": 20}
    assert cr.parse_ptxas_log("") == {}


def _record(**over):
    record = {"launch": "op#0:k", "shape": "kphi3-qkv", "dtype": "bf16", "target": "sm_90a",
              "config": "128x128x64/w8/s3", "arch": 90, "compiled": True, "has_dot": True,
              "mma": "HGMMA", "spill_store_bytes": 0, "spill_load_bytes": 0, "local_bytes": 0,
              "smem_bytes": 100_000, "smem_limit": 232448, "memory": {"LDGSTS.128": 36}}
    record.update(over)
    return record


def test_check_properties_names_each_violation():
    assert cr.check_properties(_record()) == []
    assert "not HGMMA" in cr.check_properties(_record(mma="HMMA"))[0]
    assert cr.check_properties(_record(mma="FFMA", dtype="fp32")) == []          # fp32 may use FFMA
    assert cr.check_properties(_record(mma="HMMA", arch=80, target="sm_80")) == []
    assert "spills" in cr.check_properties(_record(spill_store_bytes=8))[0]
    assert "shared memory" in cr.check_properties(_record(smem_bytes=240_000))[0]
    scalar = cr.check_properties(_record(memory={"LDG.E.U16": 64, "STG.E.U16": 8}))
    assert len(scalar) == 1 and "64 LDG.E.U16" in scalar[0] and "8 STG.E.U16" in scalar[0]
    # A gather without a dot may use scalar 16-bit accesses.
    assert cr.check_properties(_record(has_dot=False, mma="none", memory={"LDG.E.U16": 64})) == []
    assert "does not compile" in cr.check_properties(_record(compiled=False, error="boom\nmore"))[0]


def _narrow(launch, loads, m=8192, stores=0, config=(128, 128, 64, 8)):
    bp, bq, bk, warps = config
    memory = {"LDGSTS.128": 24, "LDG.E.U16": loads}
    if stores:
        memory["STG.E.U16"] = stores
    return _record(launch=f"op#1:{launch}", config_kwargs={"BLOCK_P": bp, "BLOCK_Q": bq,
                                                           "BLOCK_K": bk, "num_warps": warps},
                   uses=[{"m": m}], memory=memory)


def test_narrow_loads_only_where_the_design_makes_them():
    # dx's gathered addend: one load per accumulator element per thread (128 * 128 / 256).
    assert cr.check_properties(_narrow("gpc_io_bwd_dx", 64)) == []
    # One more (a strided K-loop operand beside it) or a narrow store still fails.
    assert "65 LDG.E.U16" in cr.check_properties(_narrow("gpc_io_bwd_dx", 65))[0]
    assert cr.check_properties(_narrow("gpc_io_bwd_dx", 64, stores=8))
    # The decode forward: one load per element of the strided A tile (64 * 64 / 128), M <= 64.
    decode = (64, 64, 64, 4)
    assert cr.check_properties(_narrow("gpc_io_fwd_fused", 32, m=16, config=decode)) == []
    assert cr.check_properties(_narrow("gpc_io_fwd_fused", 32, m=8192, config=decode))
    # The MLP tail's d(gate_up): gate and up read, their gradients written, per element.
    tile = (64, 64, 64, 4)
    assert cr.check_properties(_narrow("mlp_tail_bwd_dgate_up", 64, stores=64, config=tile)) == []
    assert cr.check_properties(_narrow("mlp_tail_bwd_dgate_up", 64, stores=65, config=tile))
    assert cr.check_properties(_narrow("mlp_tail_bwd_dgate_up", 65, stores=64, config=tile))
    # gate_up_proj's launch writing the activation layout: stores only, one per element of
    # its tile and four for the padding (128 * 128 / 256 = 64 per thread, 320 in all).
    for name in ("gpc_io_fwd_act_layout", "gpc_io_layout_fwd_act_layout"):
        assert cr.check_properties(_narrow(name, 0, stores=320)) == []
        assert cr.check_properties(_narrow(name, 0, stores=321))
        assert cr.check_properties(_narrow(name, 1, stores=64))
    # Any other matrix kernel: none at all.
    assert cr.check_properties(_narrow("gpc_io_fwd", 1))
    assert all(rule.reason for rule in cr.NARROW_ACCESSES.values())


def test_sass_reading_knows_no_kphi3_launch():
    """``kphi3_bench.sass`` compiles and reads any recorded launch; which launches exist, and the
    narrow loads their designs make, are the compile report's."""
    import ast

    from kphi3_bench import sass

    source = open(sass.__file__).read()
    nodes = list(ast.walk(ast.parse(source)))
    imported = {n.module or "" for n in nodes if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in nodes if isinstance(n, (ast.Import, ast.ImportFrom))
                 for a in n.names}
    assert not {m for m in imported if m.startswith("kphi3") or m in
                ("shapes", "compile_report", "ledger", "ledger_costs")}
    assert "NARROW_ACCESSES" not in source and "gpc_io" not in source
    # Without an allowance every scalar 16-bit load in a matrix kernel is a violation.
    record = _narrow("gpc_io_bwd_dx", 64)
    assert cr.check_properties(record) == [] and sass.check_properties(record)
    assert sass.check_properties(record, cr.narrow_allowance) == []


def _env_without_interpreter():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    return env


def test_report_refuses_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "kphi3_bench.compile_report", "--first-choice"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "TRITON_INTERPRET" in proc.stderr


# Training (M = 8192) and decode (M = 16: the IO block's one-launch forward) sizes.
@pytest.mark.parametrize("m", [8192, 16])
def test_released_shapes_bf16_first_choice_sm90a_sass(tmp_path, m):
    ok, why = cr.tools_available((90,))
    if not ok:
        pytest.skip(f"cannot compile for sm_90a here: {why}")
    out = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "kphi3_bench.compile_report", "--first-choice", "--dtypes", "bf16",
           "--shapes", "kphi3", "--targets", "90", "--jobs", "2", "--m", str(m), "--out", str(out)]
    proc = subprocess.run(cmd, env=_env_without_interpreter(), capture_output=True, text=True,
                          timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    payload = json.loads(out.read_text())
    # The numbers hold for one compiler: the report names the Triton that made them.
    assert payload["environment"]["triton"] == triton.__version__
    assert proc.stdout.startswith(f"Triton {triton.__version__}")
    records = payload["records"]
    assert records, "no launch was recorded"
    ops = {use["op"] for r in records for use in r["uses"]}
    assert ops == set(cr.OPS), f"launchers without a recorded launch: {set(cr.OPS) - ops}"
    assert all(r["target"] == "sm_90a" and r["first_choice"] for r in records)
    launches = {use["launch"] for r in records for use in r["uses"]}
    assert ("gpc_io_fwd_fused" in launches) == (m <= 64), launches
    violations = [v for r in records for v in cr.check_properties(r)]
    assert not violations, (f"{len(violations)} property violations in the sm_90a SASS:\n  - "
                            + "\n  - ".join(violations))
