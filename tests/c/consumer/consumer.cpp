// The header-only C++ wrapper over the installed static library.
#include <spiritlm_edge/client.hpp>

#include <cstdio>
#include <string>

int main(int argc, char **argv) {
    spiritlm_edge::Client client;
    sle_status st = client.connect(argc > 1 ? argv[1] : "ws://127.0.0.1:9/v1/realtime");
    std::printf("C++: %s: %s\n", std::string(spiritlm_edge::to_string(st)).c_str(),
                std::string(client.last_error()).c_str());
    return st == SLE_ERR_CONNECT ? 0 : 1;
}
