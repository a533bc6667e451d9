# The header of the compiled core: record layouts, status codes, byte-class
# tables and the cdef prototypes. The numpy dtypes in tdxve/abi.py mirror the
# packed structs below; _core.pyx checks the sizes at import.

from libc.stdint cimport int8_t, int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t

# Decoder status (same values as tdxve/_common.py ST_*).
cdef enum st:
    ST_OK = 0
    ST_NOT_IO = 1
    ST_TRUNCATED = 2
    ST_LOCK = 3
    ST_TOO_LONG = 4

# Bytes per block of the stream kernel's backward pass (fits in L1 with the input).
cdef enum:
    STREAM_BLOCK = 4096

# Byte classes for the prefix scan (see _core.pyx _init_tables).
cdef enum bcls:
    BC_OTHER = 0
    BC_OPSIZE = 1      # 66
    BC_ADDRSIZE = 2    # 67
    BC_REP = 3         # F2, F3
    BC_LOCK = 4        # F0
    BC_SEG = 5         # 26 2E 36 3E
    BC_SEG_FSGS = 6    # 64 65
    BC_REX = 7         # 40-4F (a prefix only in 64-bit mode)
    BC_IO = 8          # 6C-6F E4-E7 EC-EF

# One record of tdxve.INSN_DTYPE (20 bytes).
ctypedef packed struct insn_rec:
    int64_t offset
    int32_t port          # -1: port in DX
    uint8_t length
    uint8_t kind          # IoKind
    uint8_t size
    uint8_t rep           # numpy bool
    uint8_t addr_size
    int8_t segment        # -1: none (IN/OUT)
    uint8_t rep_prefix    # 0, 0xF2, 0xF3
    uint8_t _pad

# One record of tdxve.EXIT_QUAL_DTYPE (16 bytes).
ctypedef packed struct qual_rec:
    uint64_t raw
    uint16_t port
    uint8_t size
    uint8_t is_in
    uint8_t is_string
    uint8_t is_rep
    uint8_t is_imm
    uint8_t valid

# One record of tdxve.EXIT_INFO_DTYPE (16 bytes).
ctypedef packed struct info_rec:
    uint64_t exit_qual
    uint32_t instr_len
    uint32_t instr_info

# Mechanism, no Python objects, callable without the GIL.
cdef int decode_at(const uint8_t* p, Py_ssize_t n, int mode, insn_rec* out,
                   Py_ssize_t* stop) noexcept nogil
cdef bint qual_valid(uint64_t q) noexcept nogil
cdef int insn_exit_info(const insn_rec* r, uint64_t dx, info_rec* out) noexcept nogil
