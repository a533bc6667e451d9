# tdxve demo guest (x86-64, GNU as, AT&T syntax).
#
# Firmware-style start in real mode, through 16-bit and 32-bit protected mode
# into 64-bit mode, then the port I/O a Linux TD does early in boot:
#
#   real mode / protected mode  POST codes 0x01..0x03 -- no #VE outside 64-bit
#                               mode (TDCALL exists only there), straight to
#                               the host's devices
#   64-bit mode                 every IN/OUT below is a #VE:
#     - 16550 init exactly as Linux's earlyprintk (early_serial_hw_init,
#       arch/x86/kernel/early_printk.c; 9600 baud -> divisor 115200/9600 = 12)
#     - a banner through early_serial_putc: poll LSR until THRE (bit 5),
#       then write THR; '\n' becomes "\r\n" (early_serial_write)
#     - CMOS status register A: outb(0x0a, 0x70); inb(0x71) (CMOS_READ)
#     - PCI configuration mechanism #1: dword 0 of 00:00.0 through
#       0xCF8/0xCFC, with RAX preloaded with 0xDEADBEEF00000000 -- the live
#       measurement of ref 6.3: Linux 2022-2026 leaves 0xDEADBEEE12378086,
#       the fixed code and hardware 0x0000000012378086
#     - POST codes to port 0x80, a line on the debug console (port 0x402),
#       then HLT (a #VE on the normal path: TDG.VP.VMCALL<HLT>)
#
# The guest runs from LOAD with CS = 0 (Unicorn UC_MODE_16), identity-maps
# the first 2 MiB with one large page and keeps its data in the image:
# pci_rax holds RAX right after the PCI read, cmos_a the CMOS value.
#
# Rebuild (tests/test_embed_guests.py checks that this reproduces demo.bin):
#   as --64 -o demo.o demo.S && objcopy -O binary -j .text demo.o demo.bin

        .set LOAD,       0x8000
        .set STACK_TOP,  0x7000
        .set PML4,       0x1000
        .set PDPT,       0x2000
        .set PD,         0x3000
        .set SEL_CODE16, 0x08
        .set SEL_CODE32, 0x10
        .set SEL_DATA,   0x18
        .set SEL_CODE64, 0x20
        .set COM1,       0x3f8
        .set DEBUGCON,   0x402
        .set POST,       0x80

        .text
        .code16
_start:
        cli
        xorw    %ax, %ax
        movw    %ax, %ds
        movw    %ax, %ss
        movw    $STACK_TOP, %sp
        movb    $0x01, %al              # POST 0x01: real mode
        outb    %al, $POST
        lgdtl   (LOAD + gdt_desc - _start)
        movl    %cr0, %eax
        orl     $1, %eax                # CR0.PE
        movl    %eax, %cr0
        ljmp    $SEL_CODE16, $(LOAD + pm16 - _start)

pm16:                                   # 16-bit protected mode (CS.D = 0)
        movw    $SEL_DATA, %ax
        movw    %ax, %ds
        movw    %ax, %es
        movw    %ax, %ss
        movb    $0x02, %al              # POST 0x02: 16-bit protected mode
        outb    %al, $POST
        ljmp    $SEL_CODE32, $(LOAD + pm32 - _start)

        .code32
pm32:                                   # 32-bit protected mode (CS.D = 1)
        movb    $0x03, %al              # POST 0x03: 32-bit protected mode
        outb    %al, $POST
        movl    $(PDPT | 3), PML4       # PML4[0] -> PDPT, present + writable
        movl    $(PD | 3), PDPT         # PDPT[0] -> PD
        movl    $0x83, PD               # PD[0]: 2 MiB page at 0, present + writable + PS
        movl    $PML4, %eax
        movl    %eax, %cr3
        movl    %cr4, %eax
        orl     $0x20, %eax             # CR4.PAE
        movl    %eax, %cr4
        movl    $0xc0000080, %ecx       # IA32_EFER
        rdmsr
        orl     $0x100, %eax            # EFER.LME
        wrmsr
        movl    %cr0, %eax
        orl     $0x80000000, %eax       # CR0.PG: long mode becomes active (EFER.LMA)
        movl    %eax, %cr0
        ljmp    $SEL_CODE64, $(LOAD + lm64 - _start)

        .code64
lm64:                                   # 64-bit mode (CS.L = 1): port I/O is a #VE
        movl    $STACK_TOP, %esp
        movb    $0x04, %al              # POST 0x04: 64-bit mode
        outb    %al, $POST
        call    uart_init
        movb    $0x10, %al              # POST 0x10: UART up
        outb    %al, $POST
        leaq    banner(%rip), %rsi
        call    uart_puts
        movb    $0x0a, %al              # CMOS_READ(RTC_REG_A)
        outb    %al, $0x70
        inb     $0x71, %al
        movb    %al, cmos_a(%rip)
        movb    $0x20, %al              # POST 0x20: CMOS read
        outb    %al, $POST
        movl    $0x80000000, %eax       # enable | bus 0 | device 0 | function 0 | reg 0
        movw    $0xcf8, %dx
        outl    %eax, %dx
        movabsq $0xdeadbeef00000000, %rax
        movw    $0xcfc, %dx
        inl     %dx, %eax               # vendor/device dword of the host bridge
        movq    %rax, pci_rax(%rip)
        movb    $0x30, %al              # POST 0x30: PCI read
        outb    %al, $POST
        leaq    msg_cmos(%rip), %rsi
        call    uart_puts
        movzbl  cmos_a(%rip), %eax
        movl    $2, %ecx
        call    uart_hex
        leaq    msg_pci(%rip), %rsi
        call    uart_puts
        movq    pci_rax(%rip), %rax
        movl    $16, %ecx
        call    uart_hex
        leaq    msg_nl(%rip), %rsi
        call    uart_puts
        leaq    dbg_line(%rip), %rsi
        call    debugcon_puts
        movb    $0x40, %al              # POST 0x40: done
        outb    %al, $POST
halt:   hlt                             # a #VE on the normal path: TDG.VP.VMCALL<HLT>
        jmp     halt

# early_serial_hw_init(115200 / 9600): LCR 8n1, IER 0, FCR 0, MCR DTR|RTS,
# then the divisor through DLAB.
uart_init:
        movw    $(COM1 + 3), %dx        # LCR = 0x3 (8n1)
        movb    $0x03, %al
        outb    %al, %dx
        movw    $(COM1 + 1), %dx        # IER = 0 (no interrupt)
        movb    $0x00, %al
        outb    %al, %dx
        movw    $(COM1 + 2), %dx        # FCR = 0 (no FIFO)
        outb    %al, %dx
        movw    $(COM1 + 4), %dx        # MCR = 0x3 (DTR + RTS)
        movb    $0x03, %al
        outb    %al, %dx
        movw    $(COM1 + 3), %dx        # c = LCR
        inb     %dx, %al
        movb    %al, %bl
        orb     $0x80, %al              # LCR = c | DLAB
        outb    %al, %dx
        movw    $COM1, %dx              # DLL = divisor & 0xff
        movb    $12, %al
        outb    %al, %dx
        movw    $(COM1 + 1), %dx        # DLH = divisor >> 8
        movb    $0, %al
        outb    %al, %dx
        movw    $(COM1 + 3), %dx        # LCR = c & ~DLAB
        movb    %bl, %al
        andb    $0x7f, %al
        outb    %al, %dx
        ret

# early_serial_putc(BL): wait (at most 0xffff polls) for LSR.THRE, write THR.
uart_putc:
        movl    $0xffff, %ecx
        movw    $(COM1 + 5), %dx
2:      inb     %dx, %al
        testb   $0x20, %al
        jnz     3f
        pause                           # cpu_relax()
        decl    %ecx
        jnz     2b
3:      movw    $COM1, %dx
        movb    %bl, %al
        outb    %al, %dx
        ret

# early_serial_write: NUL-terminated string at RSI, '\n' -> "\r\n".
uart_puts:
        lodsb
        testb   %al, %al
        jz      5f
        movb    %al, %bl
        cmpb    $0x0a, %bl
        jne     4f
        pushq   %rbx
        movb    $0x0d, %bl
        call    uart_putc
        popq    %rbx
4:      call    uart_putc
        jmp     uart_puts
5:      ret

# RAX as ECX hex digits, most significant first.
uart_hex:
        movq    %rax, %r8
        shll    $2, %ecx
6:      subl    $4, %ecx
        movq    %r8, %rax
        shrq    %cl, %rax
        andl    $0xf, %eax
        leaq    hexdigits(%rip), %rsi
        movb    (%rsi,%rax), %bl
        pushq   %rcx
        call    uart_putc
        popq    %rcx
        testl   %ecx, %ecx
        jnz     6b
        ret

# NUL-terminated string at RSI to the debug console, one OUT per byte.
debugcon_puts:
        movw    $DEBUGCON, %dx
7:      lodsb
        testb   %al, %al
        jz      8f
        outb    %al, %dx
        jmp     7b
8:      ret

        .balign 8
gdt:
        .quad   0                       # null
        .quad   0x00009a000000ffff      # 0x08: 16-bit code, base 0, limit 64 KiB
        .quad   0x00cf9a000000ffff      # 0x10: 32-bit code (D = 1), flat 4 GiB
        .quad   0x00cf92000000ffff      # 0x18: data, flat 4 GiB
        .quad   0x00af9a000000ffff      # 0x20: 64-bit code (L = 1)
gdt_end:
gdt_desc:
        .word   gdt_end - gdt - 1
        .long   LOAD + gdt - _start
        .balign 8
pci_rax:
        .quad   0
cmos_a:
        .byte   0
hexdigits:
        .ascii  "0123456789abcdef"
banner:
        .asciz  "tdxve demo guest: 16550 up (Linux earlyprintk init, 9600 8n1)\n"
msg_cmos:
        .asciz  "CMOS status A = 0x"
msg_pci:
        .asciz  "\nPCI 00:00.0 dword 0 -> RAX = 0x"
msg_nl:
        .asciz  "\n"
dbg_line:
        .asciz  "tdxve demo guest: done, halting\n"
