/* Connects to a port nothing listens on: the installed library answers with a status code. */
#include <spiritlm_edge/client.h>
#include <stdio.h>
#include <string.h>

int main(int argc, char **argv) {
    sle_client *c = NULL;
    sle_status st = sle_connect(argc > 1 ? argv[1] : "ws://127.0.0.1:9/v1/realtime", NULL, &c);
    printf("spiritlm_edge_client %s: %s: %s\n", sle_version(), sle_strerror(st), sle_last_error(c));
    sle_destroy(c);
    return st == SLE_ERR_CONNECT && strcmp(sle_version(), "1.0.0") == 0 ? 0 : 1;
}
