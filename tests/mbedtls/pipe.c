/*
 * A DTLS 1.2 PSK client on mbedTLS (the library Unity's client is built on), driven line by line
 * so a test can speak the Relay protocol through it.
 *
 *   mbedtls-dtls-pipe HOST PORT IDENTITY KEY_HEX
 *
 * IDENTITY is hex (raw bytes) or, prefixed with "s:", text. KEY_HEX is the 64-byte allocation
 * key. Settings follow Unity Transport: handshake timer 1 s doubling to 60 s, MTU 1400.
 *
 * stdout: "CONNECTED <suite>" after the handshake, then "R <hex>" per received record,
 * "CLOSED" on close_notify, "ERR <code> <what>" on failure (and exit 1).
 * stdin: one hex message per line, each sent as one record; "CLOSE" sends close_notify and
 * exits; "HELLO" sends a fresh ClientHello from the same socket (Unity's reconnection probe)
 * and reports "PROBE-ANSWERED" if any datagram comes back within a second.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/select.h>
#include <sys/socket.h>

#include "mbedtls/net_sockets.h"
#include "mbedtls/ssl.h"
#include "mbedtls/entropy.h"
#include "mbedtls/ctr_drbg.h"
#include "mbedtls/timing.h"
#include "mbedtls/error.h"

static int unhex(const char *s, unsigned char *out, size_t cap) {
    size_t n = strlen(s);
    while (n > 0 && (s[n - 1] == '\n' || s[n - 1] == '\r')) n--;
    if (n % 2 || n / 2 > cap) return -1;
    for (size_t i = 0; i < n / 2; i++) {
        unsigned int b;
        if (sscanf(s + 2 * i, "%2x", &b) != 1) return -1;
        out[i] = (unsigned char)b;
    }
    return (int)(n / 2);
}

static void fail(int code, const char *what) {
    char buf[160];
    mbedtls_strerror(code, buf, sizeof buf);
    printf("ERR %d %s: %s\n", code, what, buf);
    fflush(stdout);
    exit(1);
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s HOST PORT IDENTITY KEY_HEX\n", argv[0]);
        return 2;
    }
    unsigned char identity[64], key[64];
    int id_len;
    if (strncmp(argv[3], "s:", 2) == 0) {
        id_len = (int)strlen(argv[3] + 2);
        if (id_len > 64) return 2;
        memcpy(identity, argv[3] + 2, (size_t)id_len);
    } else {
        id_len = unhex(argv[3], identity, sizeof identity);
    }
    int key_len = unhex(argv[4], key, sizeof key);
    if (id_len <= 0 || key_len != 64) {
        fprintf(stderr, "bad identity or key\n");
        return 2;
    }

    mbedtls_net_context net;
    mbedtls_ssl_context ssl;
    mbedtls_ssl_config conf;
    mbedtls_entropy_context entropy;
    mbedtls_ctr_drbg_context drbg;
    mbedtls_timing_delay_context timer;
    mbedtls_net_init(&net);
    mbedtls_ssl_init(&ssl);
    mbedtls_ssl_config_init(&conf);
    mbedtls_entropy_init(&entropy);
    mbedtls_ctr_drbg_init(&drbg);

    int r;
    if ((r = mbedtls_ctr_drbg_seed(&drbg, mbedtls_entropy_func, &entropy, NULL, 0)) != 0) fail(r, "seed");
    if ((r = mbedtls_net_connect(&net, argv[1], argv[2], MBEDTLS_NET_PROTO_UDP)) != 0) fail(r, "connect");
    if ((r = mbedtls_ssl_config_defaults(&conf, MBEDTLS_SSL_IS_CLIENT, MBEDTLS_SSL_TRANSPORT_DATAGRAM,
                                         MBEDTLS_SSL_PRESET_DEFAULT)) != 0)
        fail(r, "config");
    mbedtls_ssl_conf_rng(&conf, mbedtls_ctr_drbg_random, &drbg);
    mbedtls_ssl_conf_min_version(&conf, MBEDTLS_SSL_MAJOR_VERSION_3, MBEDTLS_SSL_MINOR_VERSION_3);
    mbedtls_ssl_conf_handshake_timeout(&conf, 1000, 60000);
    if ((r = mbedtls_ssl_conf_psk(&conf, key, 64, identity, (size_t)id_len)) != 0) fail(r, "psk");
    if ((r = mbedtls_ssl_setup(&ssl, &conf)) != 0) fail(r, "setup");
    mbedtls_ssl_set_hostname(&ssl, "relay");
    mbedtls_ssl_set_mtu(&ssl, 1400);
    mbedtls_ssl_set_bio(&ssl, &net, mbedtls_net_send, mbedtls_net_recv, mbedtls_net_recv_timeout);
    mbedtls_ssl_set_timer_cb(&ssl, &timer, mbedtls_timing_set_delay, mbedtls_timing_get_delay);

    while ((r = mbedtls_ssl_handshake(&ssl)) != 0) {
        if (r != MBEDTLS_ERR_SSL_WANT_READ && r != MBEDTLS_ERR_SSL_WANT_WRITE) fail(r, "handshake");
    }
    printf("CONNECTED %s\n", mbedtls_ssl_get_ciphersuite(&ssl));
    fflush(stdout);

    unsigned char buf[4096];
    char line[8192];
    mbedtls_ssl_conf_read_timeout(&conf, 20);
    for (;;) {
        fd_set fds;
        FD_ZERO(&fds);
        FD_SET(0, &fds);
        FD_SET(net.fd, &fds);
        struct timeval tv = {0, 50000};
        if (select(net.fd + 1, &fds, NULL, NULL, &tv) < 0) fail(-1, "select");
        if (FD_ISSET(net.fd, &fds)) {
            r = mbedtls_ssl_read(&ssl, buf, sizeof buf);
            if (r == MBEDTLS_ERR_SSL_PEER_CLOSE_NOTIFY) {
                printf("CLOSED\n");
                fflush(stdout);
                return 0;
            }
            if (r > 0) {
                printf("R ");
                for (int i = 0; i < r; i++) printf("%02x", buf[i]);
                printf("\n");
                fflush(stdout);
            } else if (r != MBEDTLS_ERR_SSL_WANT_READ && r != MBEDTLS_ERR_SSL_TIMEOUT && r != 0) {
                fail(r, "read");
            }
        }
        if (FD_ISSET(0, &fds)) {
            if (!fgets(line, sizeof line, stdin)) return 0;
            if (strncmp(line, "CLOSE", 5) == 0) {
                mbedtls_ssl_close_notify(&ssl);
                return 0;
            }
            if (strncmp(line, "HELLO", 5) == 0) {
                /* A second client context on the same socket sends a fresh ClientHello. */
                mbedtls_ssl_context probe;
                mbedtls_ssl_init(&probe);
                if ((r = mbedtls_ssl_setup(&probe, &conf)) != 0) fail(r, "probe setup");
                mbedtls_ssl_set_bio(&probe, &net, mbedtls_net_send, NULL, NULL);
                mbedtls_ssl_set_timer_cb(&probe, &timer, mbedtls_timing_set_delay, mbedtls_timing_get_delay);
                mbedtls_ssl_handshake_step(&probe); /* HELLO_REQUEST -> CLIENT_HELLO */
                mbedtls_ssl_handshake_step(&probe); /* sends the ClientHello */
                mbedtls_ssl_free(&probe);
                fd_set pf;
                FD_ZERO(&pf);
                FD_SET(net.fd, &pf);
                struct timeval ptv = {1, 0};
                if (select(net.fd + 1, &pf, NULL, NULL, &ptv) > 0) {
                    printf("PROBE-ANSWERED\n");
                } else {
                    printf("PROBE-SILENT\n");
                }
                fflush(stdout);
                continue;
            }
            int n = unhex(line, buf, sizeof buf);
            if (n < 0) {
                printf("ERR -1 bad hex line\n");
                fflush(stdout);
                continue;
            }
            r = mbedtls_ssl_write(&ssl, buf, (size_t)n);
            if (r < 0) fail(r, "write");
        }
    }
}
