# sh: a small shell on the console. It prints a prompt, reads a line, and
#   PROGRAM [N [N [N]]]   starts PROGRAM with up to three numbers as its
#                         arguments (spawn), waits for it (wait4) and says
#                         how it exited;
#   exit                  ends the shell, as does the end of input (Ctrl-D).
# An empty line gives the prompt again; an unknown program, a word that is no
# number, more than three numbers or a line longer than the buffer give a
# one-line error. Arguments are decimal; 0 means the program's default.
        .include "syscall.inc"
        .equ    LINE_MAX, 128
        .equ    NAME_MAX, 15
        .equ    MAX_ARGS, 3
        .equ    ENOENT, 2
        .text
        .globl _start
_start:
prompt:
        lea     s_prompt(%rip), %rdi
        mov     $s_prompt_len, %esi
        call    write_out
        call    read_line               # rbx = the line, NUL-terminated
        test    %rax, %rax
        jz      leave                   # end of input
        js      prompt                  # too long: said so
        call    skip_blanks
        cmpb    $0, (%rbx)
        je      prompt                  # an empty line
        call    parse_name
        test    %rax, %rax
        jnz     prompt
        call    is_exit
        test    %rax, %rax
        jnz     leave
        call    parse_args
        test    %rax, %rax
        jnz     prompt
        call    run_program
        jmp     prompt
leave:
        xor     %edi, %edi
        call    exit_prog

# Read one line into `input`: rax = 1 and rbx = input (the newline made a
# NUL) for a line; 0 at the end of input (or a read error); -1 for a line
# longer than LINE_MAX, whose rest is read and dropped, after an error line.
read_line:
        call    read_input
        test    %rax, %rax
        jle     3f
        lea     input(%rip), %rbx
        cmpb    $'\n', -1(%rbx,%rax)
        je      1f
        cmp     $LINE_MAX, %rax
        je      2f
        movb    $0, (%rbx,%rax)         # a line ended by Ctrl-D
        mov     $1, %eax
        ret
1:      movb    $0, -1(%rbx,%rax)
        mov     $1, %eax
        ret
2:      call    read_input              # drop the rest of a long line
        test    %rax, %rax
        jle     3f
        lea     input(%rip), %rbx
        cmpb    $'\n', -1(%rbx,%rax)
        jne     2b
        lea     line(%rip), %rdi        # "sh: line too long"
        lea     s_too_long(%rip), %rsi
        call    fmt_str
        call    print_line
        mov     $-1, %rax
        ret
3:      xor     %eax, %eax
        ret

# read(0, input, LINE_MAX)
read_input:
        xor     %edi, %edi
        lea     input(%rip), %rsi
        mov     $LINE_MAX, %edx
        mov     $SYS_read, %eax
        syscall
        ret

# Advance rbx over spaces and tabs.
skip_blanks:
        movb    (%rbx), %al
        cmp     $' ', %al
        je      1f
        cmp     $'\t', %al
        jne     2f
1:      inc     %rbx
        jmp     skip_blanks
2:      ret

# Is (%rbx) the end of a word (NUL, space or tab)? ZF set if so.
.macro  at_word_end
        movb    (%rbx), %al
        test    %al, %al
        jz      8f
        cmp     $' ', %al
        je      8f
        cmp     $'\t', %al
8:
.endm

# Copy the word at rbx into `name`: rax = 0, or 1 after an error line (too long).
parse_name:
        lea     name(%rip), %rdi
        xor     %ecx, %ecx
1:      at_word_end
        je      2f
        cmp     $NAME_MAX, %ecx
        jae     3f
        movb    %al, (%rdi,%rcx)
        inc     %ecx
        inc     %rbx
        jmp     1b
2:      movb    $0, (%rdi,%rcx)
        xor     %eax, %eax
        ret
3:      movb    $0, (%rdi,%rcx)         # said as far as it fits
        lea     s_no_program(%rip), %rsi
        call    say
        mov     $1, %eax
        ret

# rax = 1 if `name` is "exit".
is_exit:
        lea     name(%rip), %rsi
        lea     s_exit(%rip), %rdi
        mov     $5, %ecx                # with its NUL
1:      movb    (%rsi), %al
        cmpb    (%rdi), %al
        jne     2f
        inc     %rsi
        inc     %rdi
        dec     %ecx
        jnz     1b
        mov     $1, %eax
        ret
2:      xor     %eax, %eax
        ret

# Up to MAX_ARGS decimal numbers after the name into `args` (the rest 0):
# rax = 0, or 1 after an error line.
parse_args:
        lea     args(%rip), %rdi
        movq    $0, (%rdi)
        movq    $0, 8(%rdi)
        movq    $0, 16(%rdi)
        xor     %r12d, %r12d            # numbers so far
1:      call    skip_blanks
        cmpb    $0, (%rbx)
        je      4f
        cmp     $MAX_ARGS, %r12
        jae     5f
        xor     %r13d, %r13d            # the value
2:      at_word_end
        je      3f
        sub     $'0', %al
        cmp     $9, %al
        ja      6f
        movzbl  %al, %eax
        imul    $10, %r13, %r13
        add     %rax, %r13
        inc     %rbx
        jmp     2b
3:      lea     args(%rip), %rdi
        mov     %r13, (%rdi,%r12,8)
        inc     %r12
        jmp     1b
4:      xor     %eax, %eax
        ret
5:      lea     s_too_many(%rip), %rsi
        call    say
        mov     $1, %eax
        ret
6:      lea     s_not_number(%rip), %rsi
        call    say
        mov     $1, %eax
        ret

# spawn(name, args), wait4 for it, and say how it exited (or why it did not start).
run_program:
        mov     $SYS_spawn, %eax
        lea     name(%rip), %rdi
        lea     args(%rip), %rcx
        mov     (%rcx), %rsi
        mov     8(%rcx), %rdx
        mov     16(%rcx), %r10
        syscall
        test    %rax, %rax
        js      2f
        mov     %rax, %r12              # the child's pid
        mov     $SYS_wait4, %eax
        mov     %r12, %rdi
        lea     status(%rip), %rsi
        xor     %edx, %edx
        xor     %r10d, %r10d
        syscall
        test    %rax, %rax
        js      3f
        # "sh: NAME (pid P) exited with code C"
        call    start_name_line
        lea     s_pid(%rip), %rsi
        call    fmt_str
        mov     %rax, %rdi
        mov     %r12, %rsi
        call    fmt_dec
        mov     %rax, %rdi
        lea     s_exited(%rip), %rsi
        call    fmt_str
        mov     %rax, %rdi
        movzbl  status+1(%rip), %esi
        call    fmt_dec
        jmp     print_line
2:      mov     %rax, %r12
        cmp     $-ENOENT, %rax
        jne     1f
        lea     s_no_program(%rip), %rsi
        jmp     say
1:      lea     s_cannot(%rip), %rsi    # "sh: NAME: cannot start it: error E"
        jmp     4f
3:      mov     %rax, %r12
        lea     s_no_wait(%rip), %rsi   # "sh: NAME: cannot wait for it: error E"
4:      push    %rsi
        call    start_name_line
        pop     %rsi
        call    fmt_str
        mov     %rax, %rdi
        mov     %r12, %rsi
        neg     %rsi
        call    fmt_dec
        jmp     print_line

# line = "sh: NAME"; rax and rdi = its end.
start_name_line:
        lea     line(%rip), %rdi
        lea     s_sh(%rip), %rsi
        call    fmt_str
        mov     %rax, %rdi
        lea     name(%rip), %rsi
        call    fmt_str
        mov     %rax, %rdi
        ret

# Say "sh: NAME" and the message at rsi, on a line.
say:
        push    %rsi
        call    start_name_line
        pop     %rsi
        call    fmt_str
        jmp     print_line

        .include "lib.inc"

        .section .rodata
s_prompt:     .ascii "$ "
        .equ    s_prompt_len, . - s_prompt
s_sh:         .asciz "sh: "
s_exit:       .asciz "exit"
s_pid:        .asciz " (pid "
s_exited:     .asciz ") exited with code "
s_no_program: .asciz ": no such program"
s_cannot:     .asciz ": cannot start it: error "
s_no_wait:    .asciz ": cannot wait for it: error "
s_too_many:   .asciz ": too many numbers (at most 3)"
s_not_number: .asciz ": an argument is not a decimal number"
s_too_long:   .asciz "sh: line too long"

        .bss
input:  .skip   LINE_MAX + 1
name:   .skip   NAME_MAX + 1
        .balign 8
args:   .skip   8 * MAX_ARGS
status: .skip   4
line:   .skip   128
