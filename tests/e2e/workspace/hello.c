#include <stdio.h>

int main(int argc, char **argv) {
    printf("hello from hearth %s\n", argc > 1 ? argv[1] : "test");
    return 0;
}
