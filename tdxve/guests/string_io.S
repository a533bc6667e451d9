# tdxve failure-path guest (x86-64, GNU as, AT&T syntax): string I/O.
#
# One `rep outsb` writes a whole line to the UART's THR. In a TD that is a
# single #VE with exit-qualification bit 4 (string) set. Linux never handles
# it (handle_io returns -EIO, ref 1.8): in the early window the kernel ends in
# "PANIC: early exception 0x14 ..."; later it relies on unrolling string I/O
# (CC_ATTR_GUEST_UNROLL_STRING_IO). A guest model that emulates string I/O
# (string_io="emulate") transfers the bytes one TDVMCALL at a time.
#
# Starts in 64-bit mode at LOAD (Unicorn UC_MODE_64, no GDT of its own);
# emulation is meant to stop at `done` (the `until` address).
#
# Rebuild (tests/test_embed_guests.py checks that this reproduces string_io.bin):
#   as --64 -o string_io.o string_io.S && objcopy -O binary -j .text string_io.o string_io.bin

        .set COM1, 0x3f8
        .set POST, 0x80

        .text
        .code64
_start:
        movb    $0x50, %al              # POST 0x50: about to use string I/O
        outb    %al, $POST
        leaq    msg(%rip), %rsi
        movl    $(msg_end - msg), %ecx
        movw    $COM1, %dx
        cld
        rep outsb                       # the whole line: one instruction, one #VE
        movb    $0x51, %al              # POST 0x51: string I/O survived
        outb    %al, $POST
done:
        hlt
        jmp     done

msg:
        .ascii  "rep outsb: one instruction, one #VE, the whole line\r\n"
msg_end:
